"""Serve a MONAI bundle (Model Zoo layout) as a segmentation :class:`~workers.models.base.Model`.

Why: the bundle (``configs/inference.json``, ``configs/metadata.json``, ``models/model.pt``)
is the contract between training and serving. Re-implementing a bundle's
preprocessing by hand is how serving drifts from training, so this loader runs the
bundle's *own* ``network_def``, ``preprocessing``, ``inferer`` and ``postprocessing``
through MONAI's ``ConfigParser``, leaving out only file I/O (``LoadImaged`` and
``SaveImaged``): the series arrives as a :class:`~workers.volume.Volume`, and the
label map goes back to the pipeline instead of to a NIfTI file.

Confidence: when the bundle's postprocessing turns the network's output into
probabilities with a softmax (``Activationsd(softmax=True)`` on the prediction), the
loader also reports the result's ``low_confidence_fraction``
(:func:`low_confidence_fraction`), computed from the network's logits on the
network's grid, before the postprocessing: the postprocessing hides the
probabilities (it ends in an argmax), and computing them once more there costs a
fraction of a per cent of the inference (one ``logsumexp`` over the channels).

How a :class:`Volume` enters MONAI (:func:`volume_to_metatensor`): as the
``MetaTensor`` that ``LoadImage`` gives for that series - spatial index order
(column, row, slice), the RAS affine, ``space`` RAS - with the channel first,
``(1, X, Y, Z)``, and ``original_channel_dim`` 0 so that the bundle's
``EnsureChannelFirstd`` leaves it alone. The postprocessing must bring the
prediction back to that input grid (``Invertd``, as Model Zoo bundles do);
:func:`label_map_to_volume` checks shape and affine and returns it on the volume's
``[slice, row, column]`` grid. Any other result is an error naming the bundle.
When the postprocessing ends in such an ``Invertd`` and the preprocessing only
reoriented and respaced the image, :class:`InferencePipeline` takes that last step
itself, by a separable nearest-neighbour lookup (:mod:`workers.models.label_resampling`):
the same label map, in uint8, without ``Invertd``'s float64 sampling grid of the
series' size (4.2 GiB and 3.5 s for a 300-slice CT, against 0.1 GiB and 0.6 s).

Labels: a bundle's output values are mapped to coded concepts by a
``{bundle value: SegmentLabel}`` mapping - from the registry entry
(``config/models.yaml``) or the metadata's ``dicom_node.labels``. Output values
without a mapping become background (0), so an admin can serve a subset of a
large model's labels (e.g. a few organs of a whole-body model).

Reading a bundle's metadata (labels, version, declared input and outputs) is
:mod:`dicom_node.model_catalog`'s job, shared with the node's pages; opening a
bundle (device, config, overrides, weights) is :mod:`workers.models.loading`'s,
shared with the other loaders.

Trust: a bundle's configs are code (MONAI evaluates their ``$`` expressions and
imports their ``_target_`` classes), so install only bundles from trusted sources;
weights are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from dicom_node.contracts import SegmentLabel
from dicom_node.model_catalog import BundleError, output_channel_def
from workers.models.base import LabelledModel, ModelKind, SegmentationResult
from workers.models.loading import (
    BundleModel,
    bundle_network,
    bundle_parser,
    check_modality,
    mapping_or_metadata,
    open_bundle,
)
from workers.models.label_resampling import SeparableLookup, input_grid_lookup, resample_nearest
from workers.volume import Volume

__all__ = [
    "FILE_LOADERS",
    "InferenceOutput",
    "InferencePipeline",
    "MonaiBundleModel",
    "SegmentationPipelineModel",
    "applies_softmax",
    "label_map_to_volume",
    "low_confidence_fraction",
    "ras_affine",
    "remap_labels",
    "volume_to_metatensor",
    "without_transforms",
]

logger = logging.getLogger(__name__)

#: Flips LPS (DICOM patient) coordinates to RAS (MONAI/NIfTI world) and back.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Transforms that read or write files: the node hands volumes in and takes label maps out itself
#: (every bundle loader leaves them out).
FILE_LOADERS = ("LoadImage", "LoadImaged")
_SAVERS = ("SaveImage", "SaveImaged")
#: Largest disagreement (mm) between the input affine and the returned label map's affine.
_AFFINE_TOLERANCE_MM = 1e-3
#: A labelled voxel whose winning softmax probability is below this counts as low-confidence.
LOW_CONFIDENCE_PROBABILITY = 0.5


def remap_labels(raw: npt.NDArray[np.integer], mapping: Mapping[int, SegmentLabel]) -> npt.NDArray[np.uint8]:
    """Bundle output values -> the node's label values (uint8); values without a mapping become 0."""
    top = max(int(raw.max(initial=0)), max(mapping, default=0))
    lut = np.zeros(top + 1, dtype=np.uint8)
    for source, label in mapping.items():
        lut[source] = label.value
    return lut[raw]


# --------------------------------------------------------------------------- geometry


def ras_affine(volume: Volume) -> npt.NDArray[np.float64]:
    """4x4 matrix mapping (column, row, slice) indices to RAS mm: the affine ``LoadImage`` gives this series."""
    spacing = np.asarray(volume.spacing_mm, dtype=np.float64)
    lps = np.eye(4)
    # MONAI's readers index (column, row, slice): the Volume's array axes in reverse.
    for monai_axis, volume_axis in enumerate((2, 1, 0)):
        lps[:3, monai_axis] = volume.axes[volume_axis] * spacing[volume_axis]
    lps[:3, 3] = volume.origin_mm
    return _LPS_TO_RAS @ lps


def volume_to_metatensor(volume: Volume) -> Any:
    """The volume as MONAI's ``LoadImage`` + ``EnsureChannelFirst`` give it: ``(1, X, Y, Z)`` float32, RAS affine."""
    from monai.data import MetaTensor

    array = np.ascontiguousarray(volume.array.transpose(2, 1, 0), dtype=np.float32)[None]
    affine = torch.as_tensor(ras_affine(volume), dtype=torch.float64)
    meta = {
        "affine": affine,
        "original_affine": affine.clone(),
        "spatial_shape": np.asarray(array.shape[1:], dtype=np.int64),
        "space": "RAS",
        "original_channel_dim": 0,
        "filename_or_obj": volume.series_instance_uid,
    }
    return MetaTensor(torch.from_numpy(array), affine=affine, meta=meta)


def label_map_to_volume(prediction: Any, volume: Volume, source: str) -> npt.NDArray[np.integer]:
    """A postprocessed ``(1, X, Y, Z)`` label map back on the volume's ``[slice, row, column]`` grid.

    ``source`` names the model in errors. Raises :class:`BundleError` when the
    prediction has more than one channel, another shape, another affine than the
    input (postprocessing that does not invert back to the input grid) or
    negative values. The values are returned in the smallest integer type that
    holds them (uint8 for up to 255 labels): a label map of a 1,000-slice CT is
    262 MB in uint8, 2.1 GB in int64.
    """
    tensor = prediction if isinstance(prediction, torch.Tensor) else torch.as_tensor(np.asarray(prediction))
    affine = getattr(tensor, "affine", None)
    tensor = tensor.detach().cpu()
    expected = tuple(reversed(volume.shape))
    if tensor.ndim == 4:
        if tensor.shape[0] != 1:
            raise BundleError(
                f"{source}: postprocessing returned {tensor.shape[0]} channels; a segmentation model must end in a "
                "single-channel label map (e.g. AsDiscreted(argmax=True))"
            )
        tensor = tensor[0]
    if tuple(tensor.shape) != expected:
        raise BundleError(
            f"{source}: label map has shape {tuple(tensor.shape)} (X, Y, Z) but series {volume.series_instance_uid} "
            f"has {expected}; the postprocessing must invert the preprocessing back to the input grid (Invertd)"
        )
    if affine is not None:
        got = np.asarray(affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else affine, np.float64)
        want = ras_affine(volume)
        if got.shape == (4, 4) and not np.allclose(got, want, atol=_AFFINE_TOLERANCE_MM):
            worst = float(np.abs(got - want).max())
            raise BundleError(
                f"{source}: label map affine differs from the input's by up to {worst:.3g} mm for series "
                f"{volume.series_instance_uid}; the postprocessing must invert the preprocessing (Invertd)"
            )
    labels = label_values_array(tensor, source)
    return np.ascontiguousarray(labels.transpose(2, 1, 0))


def label_values_array(labels: Any, source: str) -> npt.NDArray[np.integer]:
    """``labels`` (a tensor or array of label values, any dtype) rounded into the smallest integer numpy type.

    uint8 when every value fits (0..255), else uint16 or int32. Floating values are
    rounded half to even, as ``np.rint`` does. Raises :class:`BundleError` (naming
    ``source``) for a negative value.
    """
    array = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if array.size == 0:
        return array.astype(np.uint8)
    low, high = float(array.min()), float(array.max())
    if np.rint(low) < 0:
        raise BundleError(f"{source}: label map has negative value {int(np.rint(low))}")
    dtype = np.uint8 if np.rint(high) <= 255 else np.uint16 if np.rint(high) <= 65535 else np.int32
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(dtype, copy=False)
    if array.ndim < 2:
        return np.rint(array).astype(dtype)
    out = np.empty(array.shape, dtype=dtype)
    # Slice by slice along the first axis: rounding a whole volume at once needs a float copy of it.
    for index in range(array.shape[0]):
        np.rint(array[index], out=out[index], casting="unsafe")
    return out


# --------------------------------------------------------------------------- running


def low_confidence_fraction(logits: torch.Tensor) -> float | None:
    """Of the voxels labelled foreground, the fraction the network was unsure of (the OOD signal).

    ``logits``: ``(C, ...)`` network output, one channel per label value, channel 0
    background, turned into probabilities by a softmax over the channels. A voxel is
    labelled foreground when its argmax is not 0; it is low-confidence when its winning
    softmax probability is below :data:`LOW_CONFIDENCE_PROBABILITY` (0.5). 0.0 when no
    voxel is foreground. None for fewer than three channels: the winner of two classes
    always has at least 0.5, so the signal would say nothing (and a rule that needs it
    holds the result rather than passing it unverified).
    """
    if logits.ndim < 2 or logits.shape[0] < 3:
        return None
    with torch.no_grad():
        top, winner = logits.max(dim=0)
        foreground = winner != 0
        labelled = int(foreground.sum())
        if labelled == 0:
            return 0.0
        # p_max = exp(top - logsumexp): below 0.5 exactly when top - logsumexp < log 0.5.
        unsure = (top - torch.logsumexp(logits, dim=0)) < math.log(LOW_CONFIDENCE_PROBABILITY)
        return int((unsure & foreground).sum()) / labelled


@dataclass(frozen=True)
class InferenceOutput:
    """What one run gives: the model's own label values on the volume's grid and its confidence signal."""

    values: npt.NDArray[np.integer]
    low_confidence_fraction: float | None


@dataclass
class InferencePipeline:
    """Preprocessing, network, inferer and postprocessing of one segmentation model, without file I/O.

    Why a class of its own: MONAI bundles and TorchScript models differ only in
    where these four parts come from; how a volume goes through them is the same.
    ``preprocessing`` and ``postprocessing`` are MONAI dictionary transforms on
    ``{image_key: image}`` and ``{image_key: image, pred_key: prediction}``.
    ``softmax_output``: the network gives logits that the postprocessing turns into
    probabilities with a softmax; only then is :func:`low_confidence_fraction` computed.
    """

    source: str
    preprocessing: Callable[[dict[str, Any]], dict[str, Any]]
    network: Callable[..., Any]
    inferer: Callable[..., Any]
    postprocessing: Callable[[dict[str, Any]], dict[str, Any]]
    device: torch.device
    amp: bool
    image_key: str = "image"
    pred_key: str = "pred"
    softmax_output: bool = False

    def __post_init__(self) -> None:
        """Split a final ``Invertd`` of the prediction off the postprocessing (``_head``, ``_invert``).

        Only an ``Invertd`` that ends the chain, inverts ``pred_key`` with the image's
        transforms, interpolates nearest and has no device or post function is split
        off: :meth:`_on_input_grid` replaces it by a lookup with the same result.
        """
        self._head: Callable[[dict[str, Any]], dict[str, Any]] = self.postprocessing
        self._invert: Any = None
        transforms = getattr(self.postprocessing, "transforms", None)
        last = transforms[-1] if transforms else None
        if (type(last).__name__ == "Invertd" and list(last.keys) == [self.pred_key]
                and list(last.orig_keys) == [self.image_key] and all(last.nearest_interp)
                and all(f is None for f in last.post_func) and all(d is None for d in last.device)):
            self._head, self._invert = without_last(self.postprocessing), last

    def label_values(self, volume: Volume) -> npt.NDArray[np.integer]:
        """The model's output values on the volume's ``[slice, row, column]`` grid (its own label values)."""
        return self.run(volume).values

    def run(self, volume: Volume) -> InferenceOutput:
        """Run on ``volume``: its label values (see :meth:`label_values`) and the low-confidence fraction."""
        data = self._preprocessed(volume)
        image = data[self.image_key]
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.amp):
            prediction = self.inferer(image[None].to(self.device), self.network)
        if not isinstance(prediction, torch.Tensor):
            raise BundleError(f"{self.source}: inferer returned {type(prediction).__name__}, expected one tensor")
        data[self.pred_key] = prediction[0].float()
        del prediction, image
        fraction = low_confidence_fraction(data[self.pred_key]) if self.softmax_output else None
        with torch.no_grad():
            data = self._head(data)
            values = self._on_input_grid(data, volume)
        return InferenceOutput(values, fraction)

    def _preprocessed(self, volume: Volume) -> dict[str, Any]:
        """The preprocessing's output for ``volume``.

        A plain MONAI ``Compose`` runs through ``execute_compose`` (what ``Compose``
        calls) given the input dictionary directly: ``Compose.__call__`` would hold the
        input - the volume's ``(X, Y, Z)`` copy, 1 GB for a 1,000-slice CT - until the
        last transform, beside the reoriented copy and the respacing's float64 one.
        """
        from monai.transforms import Compose
        from monai.transforms.compose import execute_compose

        chain = self.preprocessing
        if type(chain) is not Compose:
            return chain({self.image_key: volume_to_metatensor(volume)})
        return execute_compose(  # type: ignore[return-value]
            {self.image_key: volume_to_metatensor(volume)}, chain.transforms, map_items=chain.map_items,
            unpack_items=chain.unpack_items, lazy=chain.lazy, overrides=chain.overrides, log_stats=chain.log_stats,
        )

    def _on_input_grid(self, data: dict[str, Any], volume: Volume) -> npt.NDArray[np.integer]:
        """The label values on the volume's ``[slice, row, column]`` grid.

        With a final ``Invertd`` split off (:meth:`__post_init__`) and a
        preprocessing that only reoriented and respaced the image, by a separable
        nearest-neighbour lookup (:mod:`workers.models.label_resampling`) from the label
        map on the network's grid, in its small integer type: the same values as
        ``Invertd`` gives, without its float64 sampling grid of three coordinates per
        voxel of the series. Otherwise by that ``Invertd``, then :func:`label_map_to_volume`.
        """
        prediction = data[self.pred_key]
        image = data.get(self.image_key)
        if self._invert is not None:
            lookup = None
            if isinstance(prediction, torch.Tensor) and prediction.ndim == 4 and prediction.shape[0] == 1 and \
                    hasattr(image, "applied_operations") and tuple(prediction.shape[1:]) == tuple(image.shape[1:]):
                lookup = input_grid_lookup(image.applied_operations, image.affine.numpy(), tuple(image.shape[1:]),
                                           ras_affine(volume), tuple(reversed(volume.shape)))
            if lookup is None:
                data = self._invert(data)
            else:
                on_network_grid = label_values_array(prediction[0].detach().cpu(), self.source)
                # The lookup is for the input's (X, Y, Z) axes; the volume's are (Z, Y, X).
                zyx = SeparableLookup(source_axes=lookup.source_axes[::-1], indices=lookup.indices[::-1])
                return resample_nearest(on_network_grid, zyx)
        return label_map_to_volume(data[self.pred_key], volume, self.source)


def without_last(compose: Any) -> Any:
    """A copy of the MONAI ``Compose`` ``compose`` without its last transform."""
    return _compose_like(compose, list(compose.transforms[:-1]))


def without_transforms(compose: Any, names: Sequence[str], source: str, key: str) -> Any:
    """A copy of the MONAI ``Compose`` ``compose`` without transforms whose class is named in ``names``."""
    from monai.transforms import Compose

    if not isinstance(compose, Compose):
        raise BundleError(f"{source}: inference.json '{key}' must be a Compose, got {type(compose).__name__}")
    return _compose_like(compose, [t for t in compose.flatten().transforms if type(t).__name__ not in names])


def _compose_like(compose: Any, transforms: list[Any]) -> Any:
    """A MONAI ``Compose`` of ``transforms`` with the options of ``compose``."""
    from monai.transforms import Compose

    return Compose(
        transforms,
        map_items=compose.map_items,
        unpack_items=compose.unpack_items,
        log_stats=compose.log_stats,
        lazy=compose.lazy,
        overrides=compose.overrides,
    )


class SegmentationPipelineModel(LabelledModel):
    """What every segmentation loader serves once it has its :class:`InferencePipeline` and labels.

    Subclasses set ``_pipeline``, ``_mapping`` and ``_algorithm``; ``_modality`` (the
    declared input modality, None: any) is checked before every run.
    """

    _pipeline: InferencePipeline
    _modality: str | None = None

    @property
    def kind(self) -> ModelKind:
        return "segmentation"

    def predict_values(self, volume: Volume) -> npt.NDArray[np.integer]:
        """The model's own output values on the volume's ``[slice, row, column]`` grid (before label mapping)."""
        check_modality(self._modality, volume, self._pipeline.source)
        return self._pipeline.label_values(volume)

    def predict(self, volume: Volume) -> SegmentationResult:
        """Segment ``volume``: a uint8 label map in its own grid, values mapped to this model's labels.

        ``low_confidence_fraction`` is set when the model's postprocessing applies a softmax.
        """
        check_modality(self._modality, volume, self._pipeline.source)
        output = self._pipeline.run(volume)
        return SegmentationResult(label_map=remap_labels(output.values, self._mapping), labels=self.labels,
                                  low_confidence_fraction=output.low_confidence_fraction)


class MonaiBundleModel(SegmentationPipelineModel, BundleModel):
    """A segmentation MONAI bundle, loaded once, run on volumes with its own configs.

    ``bundle_dir``: the bundle folder. ``device``: see :func:`~workers.models.loading.resolve_device`;
    AMP (float16 autocast) is used on CUDA unless ``amp`` says otherwise. ``labels``:
    ``{bundle value: SegmentLabel}`` (default: the metadata's ``dicom_node.labels``).
    ``overrides``: MONAI config ids and values set before parsing, e.g.
    ``{"inferer#sw_batch_size": 2}`` (what ``monai.bundle run`` takes as overrides).
    ``random_weights``: keep the network randomly initialised instead of loading
    ``models/model.pt`` - only to prove that a bundle's configs run (Model Zoo
    configs without their weights). ``model_id``, ``name``, ``version`` name the
    model in results (defaults: folder name, metadata ``name`` and ``version``).
    """

    def __init__(
        self,
        bundle_dir: str | Path,
        *,
        device: str | torch.device | None = None,
        labels: Mapping[int, SegmentLabel] | None = None,
        overrides: Mapping[str, Any] | None = None,
        random_weights: bool = False,
        amp: bool | None = None,
        model_id: str | None = None,
        name: str | None = None,
        version: str | None = None,
    ) -> None:
        started = time.perf_counter()
        bundle = open_bundle(bundle_dir, kind="segmentation", device=device, model_id=model_id, name=name,
                             version=version)
        source = self._keep(bundle)
        self._mapping = mapping_or_metadata(labels, bundle.meta, source, "give the model's labels (bundle value -> "
                                            "coded concept) in its config/models.yaml entry")
        _check_channels(self._mapping, bundle.meta, source)
        parser = bundle_parser(bundle, overrides, ("network_def", "preprocessing", "inferer", "postprocessing"))
        network = bundle_network(parser, bundle, random_weights=random_weights)
        postprocessing = without_transforms(parser.get_parsed_content("postprocessing"), _SAVERS, source,
                                            "postprocessing")
        self._pipeline = InferencePipeline(
            source=source,
            preprocessing=without_transforms(parser.get_parsed_content("preprocessing"), FILE_LOADERS, source,
                                             "preprocessing"),
            network=network,
            inferer=parser.get_parsed_content("inferer"),
            postprocessing=postprocessing,
            device=self.device,
            amp=self.device.type == "cuda" if amp is None else bool(amp),
            image_key=str(parser.get("image_key", "image")),
            softmax_output=applies_softmax(postprocessing, "pred"),
        )
        logger.info(
            "loaded %s as model %s on %s (AMP %s) in %.1f s",
            source, self._algorithm.model_id, self.device, self._pipeline.amp, time.perf_counter() - started,
        )


def applies_softmax(compose: Any, key: str) -> bool:
    """Whether the MONAI ``Compose`` ``compose`` applies a softmax to ``key`` (``Activationsd(softmax=True)``)."""
    for transform in compose.flatten().transforms:
        if type(transform).__name__ != "Activationsd":
            continue
        for name, softmax in zip(transform.keys, transform.softmax):
            if name == key and softmax:
                return True
    return False


def _check_channels(mapping: Mapping[int, SegmentLabel], meta: Mapping[str, Any], source: str) -> None:
    """Reject labels mapped from background (0) or from values the bundle never outputs (its channel_def)."""
    for value, label in mapping.items():
        if value == 0:
            raise BundleError(f"{source}: label {label.name!r} maps bundle value 0, which is background")
    channels = output_channel_def(meta)
    if channels is None:
        return
    for value, label in mapping.items():
        if value not in channels:
            raise BundleError(
                f"{source}: label {label.name!r} maps bundle value {value}, but the bundle's outputs are "
                f"{min(channels)}..{max(channels)} with 0 = {channels.get(0, 'background')!r}"
            )
