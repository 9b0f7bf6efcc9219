"""Serve an nnU-Net v2 trained-model folder as a segmentation :class:`~workers.models.base.Model`.

Why our own inference path: the ``nnunetv2`` package pulls ``timm`` and with it
``torchvision`` (which must not be installed beside our pinned torch), plus a
training stack (batchgenerators, scikit-image, SimpleITK, pandas, ...) that a
worker never needs. Inference needs only the network classes of
``dynamic_network_architectures`` (its U-Nets import torch and numpy; installed
with ``--no-deps`` because its metadata names timm for its transformer models)
and the steps below, which follow ``nnunetv2`` 2.8.1 line by line:

1. the volume's array ``[slice, row, column]`` with its spacing is the image as
   nnU-Net's SimpleITK reader gives it (``[z, y, x]``), transposed by the plans'
   ``transpose_forward``;
2. crop to the bounding box of the non-zero region (holes filled);
3. normalisation per channel: ``CTNormalization`` (clip to the plans' foreground
   0.5/99.5 percentiles, subtract mean, divide by std), ``ZScoreNormalization``
   (within the non-zero mask when ``use_mask_for_norm``), ``NoNormalization``,
   ``RescaleTo01Normalization``;
4. resampling to the configuration's spacing (cubic in-plane, nearest along an
   anisotropic axis: ``resample_data_or_seg_to_shape``; scikit-image's ``resize``
   is ``scipy.ndimage.zoom`` with ``grid_mode=True``, which we call directly);
5. Gaussian-weighted sliding window (tile step 0.5, sigma 1/8 of the patch, fp16
   accumulation like nnU-Net), test-time mirroring over the checkpoint's
   ``inference_allowed_mirroring_axes``, the folds' logits averaged;
6. logits resampled back (linear in-plane), argmax, put back into the crop box,
   transposed back; ``postprocessing.pkl`` (largest-component removal) when the
   folder has one.

Limits (errors name them): region-based training, cascades
(``3d_cascade_fullres``), legacy v1-style plans, custom resampling functions and
network classes outside ``dynamic_network_architectures``. Checkpoints are
loaded with ``weights_only=True`` and ``postprocessing.pkl`` through an
unpickler that admits only nnU-Net's known postprocessing functions, so a
results folder cannot run code of its own (plans name their network class; only
``dynamic_network_architectures`` classes and ``torch.nn`` building blocks are
accepted).
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import logging
import pickle
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from scipy import ndimage

from dicom_node.contracts import SegmentLabel
from dicom_node.model_catalog import BundleError, NnUNetOptions, read_json_object
from workers.models.base import LabelledModel, ModelKind, SegmentationResult
from workers.models.loading import file_algorithm, resolve_device
from workers.models.monai_bundle import low_confidence_fraction, remap_labels
from workers.volume import Volume

__all__ = [
    "NnUNetModel",
    "NnUNetOptions",
    "NnUNetPlan",
    "apply_postprocessing",
    "compute_gaussian",
    "compute_steps",
    "read_plan",
    "resample_to_shape",
]

logger = logging.getLogger(__name__)

#: nnU-Net's ANISO_THRESHOLD: an axis this many times coarser than the finest is resampled separately.
ANISO_THRESHOLD = 3.0
#: Packages whose classes a plans file may name (network class; conv, norm, dropout, nonlinearity ops).
_ALLOWED_CLASS_PREFIXES = ("dynamic_network_architectures.architectures.", "torch.nn.")
_NORMALISATIONS = ("CTNormalization", "ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization")


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class NnUNetPlan:
    """What inference needs from ``plans.json`` and ``dataset.json`` for one configuration."""

    configuration: str
    transpose_forward: tuple[int, ...]
    transpose_backward: tuple[int, ...]
    spacing: tuple[float, ...]
    patch_size: tuple[int, ...]
    normalization_schemes: tuple[str, ...]
    use_mask_for_norm: tuple[bool, ...]
    intensity_properties: tuple[Mapping[str, float], ...]
    data_kwargs: Mapping[str, Any]
    probabilities_kwargs: Mapping[str, Any]
    network_class: str
    network_kwargs: Mapping[str, Any]
    network_imports: tuple[str, ...]
    labels: Mapping[str, int]
    num_channels: int

    @property
    def num_classes(self) -> int:
        return len(set(self.labels.values()))


def _configuration(plans: Mapping[str, Any], name: str, where: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The configuration ``name`` with its ``inherits_from`` chain resolved (as nnU-Net's PlansManager does)."""
    configurations = plans.get("configurations") or {}
    if name not in configurations:
        raise BundleError(f"{where}: configuration {name!r} is not in plans.json "
                          f"(it has {sorted(configurations)})")
    if name in seen:
        raise BundleError(f"{where}: configuration {name!r} inherits from itself")
    config = dict(configurations[name])
    parent = config.pop("inherits_from", None)
    if parent is not None:
        merged = _configuration(plans, parent, where, (*seen, name))
        merged.update(config)
        config = merged
    return config


def read_plan(folder: Path, configuration: str) -> NnUNetPlan:
    """The :class:`NnUNetPlan` of ``configuration`` in a trained-model folder (BundleError naming what is wrong)."""
    where = f"nnU-Net folder {folder}"
    plans = read_json_object(folder / "plans.json", f"nnU-Net folder {folder}: no plans.json")
    dataset = read_json_object(folder / "dataset.json", f"nnU-Net folder {folder}: no dataset.json")
    config = _configuration(plans, configuration, where)
    if config.get("previous_stage"):
        raise BundleError(f"{where}: configuration {configuration!r} is a cascade stage (after "
                          f"{config['previous_stage']!r}); cascades are not supported, use 3d_fullres or 3d_lowres")
    if "architecture" not in config:
        raise BundleError(f"{where}: configuration {configuration!r} has no 'architecture' (v1-style plans); "
                          "re-plan with nnunetv2 >= 2.4")
    labels = dataset.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        raise BundleError(f"{where}: dataset.json has no 'labels'")
    if any(not isinstance(v, int) for v in labels.values()):
        raise BundleError(f"{where}: dataset.json labels are regions ({labels}); region-based models are not "
                          "supported")
    labels = {k: v for k, v in labels.items() if k != "ignore"}
    if sorted(set(labels.values())) != list(range(len(set(labels.values())))):
        raise BundleError(f"{where}: dataset.json label values must be 0..N without gaps, got {labels}")
    channels = dataset.get("channel_names") or dataset.get("modality")
    if not isinstance(channels, Mapping) or not channels:
        raise BundleError(f"{where}: dataset.json has no 'channel_names'")
    for key, expected in (("resampling_fn_data", "resample_data_or_seg_to_shape"),
                          ("resampling_fn_probabilities", "resample_data_or_seg_to_shape")):
        if config.get(key) != expected:
            raise BundleError(f"{where}: {configuration} {key} is {config.get(key)!r}; only {expected!r} is supported")
    schemes = tuple(config["normalization_schemes"])
    for scheme in schemes:
        if scheme not in _NORMALISATIONS:
            raise BundleError(f"{where}: normalisation {scheme!r} is not supported (only {_NORMALISATIONS})")
    intensity = plans.get("foreground_intensity_properties_per_channel") or {}
    arch = config["architecture"]
    return NnUNetPlan(
        configuration=configuration,
        transpose_forward=tuple(plans["transpose_forward"]),
        transpose_backward=tuple(plans["transpose_backward"]),
        spacing=tuple(float(s) for s in config["spacing"]),
        patch_size=tuple(int(p) for p in config["patch_size"]),
        normalization_schemes=schemes,
        use_mask_for_norm=tuple(bool(u) for u in config["use_mask_for_norm"]),
        intensity_properties=tuple(intensity.get(str(c), {}) for c in range(len(channels))),
        data_kwargs=dict(config.get("resampling_fn_data_kwargs") or {}),
        probabilities_kwargs=dict(config.get("resampling_fn_probabilities_kwargs") or {}),
        network_class=str(arch["network_class_name"]),
        network_kwargs=dict(arch["arch_kwargs"]),
        network_imports=tuple(arch.get("_kw_requires_import") or ()),
        labels=dict(labels),
        num_channels=len(channels),
    )


def _locate(name: str, where: str) -> Any:
    """The class ``name`` (dotted path), only from the packages a plans file may name."""
    if not name.startswith(_ALLOWED_CLASS_PREFIXES):
        raise BundleError(f"{where}: plans.json names {name!r}; only classes under {_ALLOWED_CLASS_PREFIXES} are "
                          "accepted")
    module_name, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise BundleError(f"{where}: plans.json names {name!r}, which cannot be imported: {exc}") from exc


def build_network(plan: NnUNetPlan, where: str) -> torch.nn.Module:
    """The plan's network (as nnU-Net's ``get_network_from_plans``), without deep supervision."""
    kwargs = dict(plan.network_kwargs)
    for key in plan.network_imports:
        if kwargs.get(key) is not None:
            kwargs[key] = _locate(str(kwargs[key]), where)
    network_class = _locate(plan.network_class, where)
    kwargs["deep_supervision"] = False
    return network_class(input_channels=plan.num_channels, num_classes=plan.num_classes, **kwargs)


# --------------------------------------------------------------------------- checkpoints and postprocessing


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """A fold's checkpoint, tensors and plain data only (no code runs)."""
    if not path.is_file():
        raise BundleError(f"nnU-Net checkpoint {path}: no such file")
    # numpy scalars and dtypes appear in the training log nnU-Net stores beside the weights
    safe: list[Any] = [np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.float32)), type(np.dtype(np.int64))]
    safe += [np._core.multiarray.scalar] if hasattr(np, "_core") else []
    try:
        with torch.serialization.safe_globals(safe):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError/RuntimeError for what it will not load
        raise BundleError(f"nnU-Net checkpoint {path}: cannot be loaded as weights only: {exc}") from exc
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise BundleError(f"nnU-Net checkpoint {path}: no 'network_weights'")
    return checkpoint


def remove_all_but_largest_component_from_segmentation(
    segmentation: npt.NDArray[np.integer], labels_or_regions: Any, background_label: int = 0
) -> npt.NDArray[np.integer]:
    """nnU-Net's postprocessing step: of the voxels of the given labels, keep the largest connected component(s)."""
    items = labels_or_regions if isinstance(labels_or_regions, list) else [labels_or_regions]
    mask = np.zeros(segmentation.shape, dtype=bool)
    for item in items:
        mask |= np.isin(segmentation, item) if isinstance(item, tuple | list) else segmentation == item
    structure = ndimage.generate_binary_structure(segmentation.ndim, segmentation.ndim)  # skimage's default
    labelled, count = ndimage.label(mask, structure=structure)
    if count == 0:
        return segmentation.copy()
    sizes = np.bincount(labelled.ravel())[1:]
    keep = np.flatnonzero(sizes == sizes.max()) + 1
    result = segmentation.copy()
    result[mask & ~np.isin(labelled, keep)] = background_label
    return result


#: The functions a ``postprocessing.pkl`` may name: nnU-Net's module path -> our implementation.
_POSTPROCESSING_FUNCTIONS: dict[tuple[str, str], Callable[..., Any]] = {
    ("nnunetv2.postprocessing.remove_connected_components", "remove_all_but_largest_component_from_segmentation"):
        remove_all_but_largest_component_from_segmentation,
}


class _PostprocessingUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        function = _POSTPROCESSING_FUNCTIONS.get((module, name))
        if function is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not a known nnU-Net postprocessing function")
        return function


def read_postprocessing(path: Path) -> list[tuple[Callable[..., Any], dict[str, Any]]]:
    """The steps of a ``postprocessing.pkl`` (functions and their keyword arguments)."""
    try:
        with path.open("rb") as handle:
            functions, kwargs = _PostprocessingUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise BundleError(f"{path}: not a usable nnU-Net postprocessing file: {exc}") from exc
    return list(zip(functions, kwargs, strict=True))


def apply_postprocessing(segmentation: npt.NDArray[np.integer],
                         steps: Sequence[tuple[Callable[..., Any], Mapping[str, Any]]]) -> npt.NDArray[np.integer]:
    for function, kwargs in steps:
        segmentation = function(segmentation, **kwargs)
    return segmentation


# --------------------------------------------------------------------------- resampling


def _resize(image: npt.NDArray[np.float64], shape: Sequence[int], order: int) -> npt.NDArray[np.float64]:
    """scikit-image's ``resize(image, shape, order, mode='edge', anti_aliasing=False)`` on a float image."""
    if tuple(image.shape) == tuple(shape):
        return image.copy()
    zoom = [n / o for n, o in zip(shape, image.shape, strict=True)]
    out = ndimage.zoom(image, zoom, order=order, mode="nearest", grid_mode=True)
    if order > 0:
        np.clip(out, image.min(), image.max(), out=out)
    return out


def _separate_axis(current: Sequence[float], new: Sequence[float], force: bool | None) -> int | None:
    """The axis resampled on its own (nnU-Net's determine_do_sep_z_and_axis), or None."""
    def lowres(spacing: Sequence[float]) -> list[int]:
        return list(np.where(max(spacing) / np.array(spacing) == 1)[0])

    if force is not None:
        axes = lowres(current) if force else None
    elif max(current) / min(current) > ANISO_THRESHOLD:
        axes = lowres(current)
    elif max(new) / min(new) > ANISO_THRESHOLD:
        axes = lowres(new)
    else:
        axes = None
    return axes[0] if axes is not None and len(axes) == 1 else None


def resample_to_shape(data: npt.NDArray[Any], shape: Sequence[int], current_spacing: Sequence[float],
                      new_spacing: Sequence[float], *, order: int = 3, order_z: int = 0,
                      force_separate_z: bool | None = False, is_seg: bool = False) -> npt.NDArray[Any]:
    """nnU-Net's ``resample_data_or_seg_to_shape`` for images and probabilities (``data``: channels first)."""
    if is_seg:
        raise ValueError("resample_to_shape resamples images and logits, not label maps")
    new_shape = np.array(shape)
    old_shape = np.array(data.shape[1:])
    if np.all(old_shape == new_shape):
        return data
    axis = _separate_axis(current_spacing, new_spacing, force_separate_z)
    out = np.zeros((data.shape[0], *new_shape), dtype=data.dtype)
    source = data.astype(float, copy=False)
    for c in range(data.shape[0]):
        if axis is None:
            out[c] = _resize(source[c], new_shape, order)
            continue
        in_plane = [int(s) for a, s in enumerate(new_shape) if a != axis]
        partial_shape = new_shape.copy()
        partial_shape[axis] = old_shape[axis]
        partial = np.zeros(partial_shape)
        for k in range(old_shape[axis]):
            index = [slice(None)] * 3
            index[axis] = k
            partial[tuple(index)] = _resize(source[c][tuple(index)], in_plane, order)
        if old_shape[axis] == new_shape[axis]:
            out[c] = partial
            continue
        scales = [p / n for p, n in zip(partial.shape, new_shape, strict=True)]
        grid = np.mgrid[: new_shape[0], : new_shape[1], : new_shape[2]].astype(float)
        coords = np.array([scale * (grid[a] + 0.5) - 0.5 for a, scale in enumerate(scales)])
        out[c] = ndimage.map_coordinates(partial, coords, order=order_z, mode="nearest")
    return out


def _new_shape(shape: Sequence[int], old_spacing: Sequence[float], new_spacing: Sequence[float]) -> list[int]:
    return [round(o / n * s) for o, n, s in zip(old_spacing, new_spacing, shape, strict=True)]


# --------------------------------------------------------------------------- sliding window


def compute_gaussian(tile: Sequence[int], device: torch.device, sigma_scale: float = 1.0 / 8,
                     value_scaling_factor: float = 10.0) -> torch.Tensor:
    """nnU-Net's importance map: a Gaussian peaking at ``value_scaling_factor``, fp16, no zeros."""
    impulse = np.zeros(tile)
    impulse[tuple(i // 2 for i in tile)] = 1
    gaussian = ndimage.gaussian_filter(impulse, [i * sigma_scale for i in tile], 0, mode="constant", cval=0)
    gaussian /= np.max(gaussian) / value_scaling_factor
    result = torch.from_numpy(gaussian).to(device=device, dtype=torch.float16)
    zero = result == 0
    result[zero] = torch.min(result[~zero])
    return result


def compute_steps(image: Sequence[int], tile: Sequence[int], step: float) -> list[list[int]]:
    """Tile start positions per axis (nnU-Net's compute_steps_for_sliding_window)."""
    steps = []
    for size, patch in zip(image, tile, strict=True):
        count = int(np.ceil((size - patch) / (patch * step))) + 1
        stride = (size - patch) / (count - 1) if count > 1 else 0.0
        steps.append([int(np.round(stride * i)) for i in range(count)])
    return steps


def _pad_to(data: torch.Tensor, tile: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad the spatial axes to at least ``tile`` (centred like acvl_utils.pad_nd_image); the un-pad slicer."""
    spatial = data.shape[-len(tile):]
    pads = [(max(t - s, 0) // 2, max(t - s, 0) - max(t - s, 0) // 2) for s, t in zip(spatial, tile, strict=True)]
    if not any(a or b for a, b in pads):
        return data, tuple(slice(None) for _ in spatial)
    flat = [v for pair in reversed(pads) for v in pair]
    padded = torch.nn.functional.pad(data, flat, "constant", 0)
    keep = tuple(slice(a, a + s) for (a, _), s in zip(pads, spatial, strict=True))
    return padded, keep


# --------------------------------------------------------------------------- the model


class NnUNetModel(LabelledModel):
    """An nnU-Net v2 trained-model folder (one fold or an ensemble), loaded once.

    ``path``: the folder with ``dataset.json``, ``plans.json`` and ``fold_X/<checkpoint>``.
    ``options``: configuration, folds, checkpoint name, mirroring, tile step.
    ``labels``: ``{dataset.json label value: SegmentLabel}``; dataset labels without
    an entry become background.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        options: NnUNetOptions,
        labels: Mapping[int, SegmentLabel],
        device: str | torch.device | None = None,
        model_id: str | None = None,
        name: str | None = None,
        version: str = "unknown",
    ) -> None:
        started = time.perf_counter()
        self.path = Path(path)
        where = f"nnU-Net folder {self.path}"
        if not self.path.is_dir():
            raise BundleError(f"{where}: no such folder")
        self.plan = read_plan(self.path, options.configuration)
        values = set(self.plan.labels.values())
        for value, label in labels.items():
            if value == 0:
                raise BundleError(f"{where}: label {label.name!r} maps value 0, which is background")
            if value not in values:
                raise BundleError(f"{where}: label {label.name!r} maps value {value}, which dataset.json does not "
                                  f"have (its labels: {self.plan.labels})")
        unmapped = sorted(n for n, v in self.plan.labels.items() if v != 0 and v not in labels)
        if unmapped:
            logger.warning("%s: dataset.json labels %s have no registry label and become background", where, unmapped)
        self.options = options
        self.device = resolve_device(device)
        self.network = build_network(self.plan, where).to(self.device).eval()
        self.weights: list[dict[str, torch.Tensor]] = []
        mirror_axes: tuple[int, ...] | None = None
        for i, fold in enumerate(options.folds):
            checkpoint_path = self.path / f"fold_{fold}" / options.checkpoint
            checkpoint = _load_checkpoint(checkpoint_path)
            trained_on = (checkpoint.get("init_args") or {}).get("configuration")
            if trained_on is not None and trained_on != options.configuration:
                raise BundleError(f"{checkpoint_path}: trained for configuration {trained_on!r}, the registry asks for "
                                  f"{options.configuration!r}")
            try:
                self.network.load_state_dict(checkpoint["network_weights"])
            except RuntimeError as exc:
                raise BundleError(f"{checkpoint_path}: weights do not fit the plans' {self.plan.network_class} "
                                  f"(trainer {checkpoint.get('trainer_name')!r} may build its own network): "
                                  f"{exc}") from exc
            self.weights.append({k: v.to(self.device) for k, v in checkpoint["network_weights"].items()})
            if i == 0 and checkpoint.get("inference_allowed_mirroring_axes") is not None:
                mirror_axes = tuple(int(a) for a in checkpoint["inference_allowed_mirroring_axes"])
        self.mirror_axes = mirror_axes if options.use_mirroring else None
        pp_path = self.path / "postprocessing.pkl"
        self.postprocessing = read_postprocessing(pp_path) if pp_path.is_file() else []
        self._mapping = dict(labels)
        self._algorithm = file_algorithm(self.path, model_id, name, version)
        logger.info("loaded %s (%s, folds %s, postprocessing steps %d) as model %s on %s in %.1f s", where,
                    options.configuration, list(options.folds), len(self.postprocessing),
                    self._algorithm.model_id, self.device, time.perf_counter() - started)

    @property
    def kind(self) -> ModelKind:
        return "segmentation"

    # ------------------------------------------------------------------ steps

    def preprocess(self, image: npt.NDArray[np.floating], spacing: Sequence[float]
                   ) -> tuple[npt.NDArray[np.float32], dict[str, Any]]:
        """``(channels, z, y, x)`` image in reader order -> network input and what export needs."""
        plan = self.plan
        data = image.astype(np.float32).transpose([0, *[a + 1 for a in plan.transpose_forward]])
        spacing_t = [spacing[a] for a in plan.transpose_forward]
        shape_before = data.shape[1:]
        nonzero = ndimage.binary_fill_holes(np.any(data != 0, axis=0))
        if nonzero.any():
            where = np.nonzero(nonzero)
            box = [(int(w.min()), int(w.max()) + 1) for w in where]
        else:
            box = [(0, s) for s in shape_before]
        crop = tuple(slice(a, b) for a, b in box)
        data = data[(slice(None), *crop)]
        mask = nonzero[crop]
        target = list(plan.spacing) if len(plan.spacing) == 3 else [spacing_t[0], *plan.spacing]
        new_shape = _new_shape(data.shape[1:], spacing_t, target)
        for c, scheme in enumerate(plan.normalization_schemes):
            data[c] = self._normalise(data[c], scheme, c, mask)
        data = resample_to_shape(data, new_shape, spacing_t, target, **plan.data_kwargs)
        return data, {"spacing": spacing_t, "shape_before": shape_before, "box": box,
                      "shape_cropped": tuple(nonzero[crop].shape), "network_spacing": target}

    def _normalise(self, image: npt.NDArray[np.float32], scheme: str, channel: int,
                   mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.float32]:
        eps = 1e-8
        if scheme == "CTNormalization":
            props = self.plan.intensity_properties[channel]
            try:
                mean, std = props["mean"], props["std"]
                low, high = props["percentile_00_5"], props["percentile_99_5"]
            except KeyError as exc:
                raise BundleError(f"nnU-Net folder {self.path}: plans.json foreground_intensity_properties_per_"
                                  f"channel[{channel}] lacks {exc}") from exc
            np.clip(image, low, high, out=image)
            image -= mean
            image /= max(std, eps)
        elif scheme == "ZScoreNormalization":
            if self.plan.use_mask_for_norm[channel]:
                values = image[mask]
                image[mask] = (values - values.mean()) / max(values.std(), eps)
            else:
                mean, std = image.mean(), image.std()
                image -= mean
                image /= max(std, eps)
        elif scheme == "RescaleTo01Normalization":
            image -= image.min()
            image /= np.clip(image.max(), a_min=eps, a_max=None)
        return image

    @torch.inference_mode()
    def _mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        prediction = self.network(x)
        if self.mirror_axes:
            axes = [a + 2 for a in self.mirror_axes]
            combinations = [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
            for flip in combinations:
                prediction += torch.flip(self.network(torch.flip(x, flip)), flip)
            prediction /= len(combinations) + 1
        return prediction

    @torch.inference_mode()
    def _sliding_window(self, data: torch.Tensor) -> torch.Tensor:
        """Logits of one set of weights on ``data`` (channels, z, y, x), fp16 like nnU-Net's."""
        tile = self.plan.patch_size
        two_d = len(tile) == 2
        padded, unpad = _pad_to(data, tile)
        spatial = padded.shape[1:]
        if two_d:
            steps = compute_steps(spatial[1:], tile, self.options.tile_step_size)
            slicers = [(slice(None), d, *(slice(s, s + t) for s, t in zip((sx, sy), tile, strict=True)))
                       for d in range(spatial[0]) for sx in steps[0] for sy in steps[1]]
        else:
            steps = compute_steps(spatial, tile, self.options.tile_step_size)
            slicers = [(slice(None), *(slice(s, s + t) for s, t in zip(start, tile, strict=True)))
                       for start in itertools.product(*steps)]
        logits = torch.zeros((self.plan.num_classes, *spatial), dtype=torch.half, device=self.device)
        counts = torch.zeros(spatial, dtype=torch.half, device=self.device)
        gaussian = compute_gaussian(tuple(tile), self.device)
        autocast = torch.autocast("cuda") if self.device.type == "cuda" else contextlib.nullcontext()
        with autocast:
            for slicer in slicers:
                patch = torch.clone(padded[slicer][None], memory_format=torch.contiguous_format)
                prediction = self._mirror_and_predict(patch)[0]
                prediction *= gaussian
                logits[slicer] += prediction
                counts[slicer[1:]] += gaussian
        torch.div(logits, counts, out=logits)
        if torch.any(torch.isinf(logits)):
            raise BundleError(f"nnU-Net folder {self.path}: infinite logits in the sliding window")
        return logits[(slice(None), *unpad) if not two_d else (slice(None), slice(None), *unpad)]

    def predict_logits(self, data: npt.NDArray[np.float32]) -> torch.Tensor:
        """The folds' averaged logits (fp16, on the CPU) for preprocessed ``data``."""
        tensor = torch.from_numpy(np.ascontiguousarray(data)).to(self.device)
        total: torch.Tensor | None = None
        for weights in self.weights:
            self.network.load_state_dict(weights)
            logits = self._sliding_window(tensor).to("cpu")
            total = logits if total is None else total + logits
        assert total is not None
        if len(self.weights) > 1:
            total /= len(self.weights)
        return total

    def export(self, logits: torch.Tensor, info: Mapping[str, Any]) -> npt.NDArray[np.uint8]:
        """Logits on the network grid -> label values on the reader grid (nnU-Net's export)."""
        probabilities = resample_to_shape(logits.numpy(), info["shape_cropped"], info["network_spacing"],
                                          info["spacing"], **self.plan.probabilities_kwargs)
        segmentation = torch.from_numpy(np.asarray(probabilities)).argmax(0).numpy()
        full = np.zeros(info["shape_before"], dtype=np.uint8)
        full[tuple(slice(a, b) for a, b in info["box"])] = segmentation
        full = full.transpose(self.plan.transpose_backward)
        return apply_postprocessing(full, self.postprocessing).astype(np.uint8, copy=False)

    def predict_values(self, image: npt.NDArray[np.floating], spacing: Sequence[float]
                       ) -> tuple[npt.NDArray[np.uint8], float | None]:
        """dataset.json label values for a ``(channels, z, y, x)`` image with ``spacing`` (z, y, x mm)."""
        data, info = self.preprocess(image, spacing)
        logits = self.predict_logits(data)
        unsure = low_confidence_fraction(logits.float())
        return self.export(logits, info), unsure

    def predict(self, volume: Volume) -> SegmentationResult:
        """Segment ``volume``: a uint8 label map on its own grid, values mapped to this model's labels."""
        if self.plan.num_channels != 1:
            raise BundleError(f"nnU-Net folder {self.path}: the model takes {self.plan.num_channels} channels; a "
                              "DICOM series gives one")
        started = time.perf_counter()
        values, unsure = self.predict_values(volume.array[None], volume.spacing_mm)
        logger.info("nnU-Net %s on %s: %.1f s", self._algorithm.model_id, volume.shape, time.perf_counter() - started)
        return SegmentationResult(label_map=remap_labels(values, self._mapping), labels=self.labels,
                                  low_confidence_fraction=unsure)

