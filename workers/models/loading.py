"""The steps every model loader takes before its own part: device, bundle folder, config, weights, labels.

Why a module of its own: the loaders of MONAI segmentation bundles
(:mod:`workers.models.monai_bundle`), classification bundles
(:mod:`workers.models.classification`), RetinaNet bundles (:mod:`workers.models.retinanet`),
CenterNet bundles (:mod:`workers.models.nodule_detector`) and single files (TorchScript,
ONNX) all open a model the same way - read the bundle's metadata, name the algorithm,
check its declared kind, pick the device, parse ``configs/inference.json`` with the
registry's overrides, build ``network_def`` and load ``models/model.pt`` - and must refuse
a broken model with the same words. Written once here, a fix (e.g. an override that names
no config item) reaches every loader.

Errors are :class:`~dicom_node.model_catalog.BundleError` naming the model (``source``:
``"bundle <folder>"`` or ``"<format> model <file>"``) and what is wrong.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dicom_node.contracts import AlgorithmInfo, SegmentLabel
from dicom_node.model_catalog import (
    BundleError,
    algorithm_info,
    declared_modality,
    label_mapping,
    metadata_labels,
    read_bundle_json,
)
from workers.models.base import LabelledModel
from workers.volume import Volume

__all__ = [
    "BundleModel",
    "OpenedBundle",
    "bundle_network",
    "bundle_parser",
    "check_modality",
    "file_algorithm",
    "load_torchscript",
    "load_weights",
    "mapping_or_metadata",
    "open_bundle",
    "resolve_device",
    "use_cudnn_benchmark",
]

logger = logging.getLogger(__name__)

#: Marks a config id that a bundle's inference.json does not have (``None`` may be a value).
MISSING = object()


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"``: the first GPU when CUDA is available, else the CPU; else ``device`` itself.

    Raises ValueError for a CUDA device on a machine without CUDA.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested, but CUDA is not available on this machine")
    return dev


def use_cudnn_benchmark(enabled: bool) -> None:
    """Set ``torch.backends.cudnn.benchmark`` for this process (``worker.cudnn_benchmark``).

    Why: cuDNN then times its convolution algorithms once per input shape and keeps the fastest; a worker
    runs the same models on similar shapes for its whole life, so the timing pays for itself. Process-wide
    (torch has no per-model switch); no effect without a GPU.
    """
    torch.backends.cudnn.benchmark = bool(enabled)
    logger.info("cuDNN benchmark mode %s%s", "on" if enabled else "off",
                "" if torch.cuda.is_available() else " (no GPU here: no effect)")


def check_modality(expected: str | None, volume: Volume, source: str) -> None:
    """Refuse a series of another modality than the model declares (no declaration, or none on the series: pass)."""
    if expected and volume.modality and volume.modality != expected:
        raise BundleError(f"{source}: expects {expected}, series {volume.series_instance_uid} is {volume.modality}")


def mapping_or_metadata(labels: Mapping[int, SegmentLabel] | None, meta: Mapping[str, Any], source: str,
                        hint: str) -> dict[int, SegmentLabel]:
    """``labels`` when the registry gives them, else the metadata's ``dicom_node.labels``.

    ``hint`` completes the error when neither has labels (what the admin should write, and where).
    """
    if labels is not None:
        return dict(labels)
    entries = metadata_labels(meta, source)
    if entries is None:
        raise BundleError(f"{source}: metadata has no dicom_node.labels; {hint}")
    return label_mapping(entries, source)


def load_weights(network: torch.nn.Module, path: Path, source: str) -> None:
    """Load the state dict at ``path`` into ``network`` (``weights_only``; CheckpointSaver's ``{"model": ...}`` too).

    Raises :class:`BundleError` naming ``source`` and ``path`` when the weights do not fit the network.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):  # CheckpointSaver's {"model": ...}
        state = state["model"]
    try:
        network.load_state_dict(state)
    except RuntimeError as exc:
        raise BundleError(f"{source}: {path} does not fit the bundle's network_def: {exc}") from exc


def load_torchscript(path: Path, device: torch.device, source: str) -> Any:
    """A TorchScript file loaded onto ``device`` in eval mode; BundleError naming ``source`` if it is not one."""
    with warnings.catch_warnings():
        # torch.jit is deprecated in recent PyTorch, but model.ts is what MONAI bundles ship.
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
        try:
            network = torch.jit.load(str(path), map_location=device)
        except RuntimeError as exc:
            raise BundleError(f"{source}: not a loadable TorchScript file: {exc}") from exc
    return network.eval()


def file_algorithm(path: Path, model_id: str | None, name: str | None, version: str) -> AlgorithmInfo:
    """The identity of a model that is one file or folder without metadata: named after it unless told otherwise."""
    stem = path.stem if path.is_file() else path.name
    return AlgorithmInfo(name=(name or stem)[:64], version=version[:64], model_id=model_id or stem)


@dataclass(frozen=True)
class OpenedBundle:
    """A bundle folder read as far as every loader reads it: metadata, identity, modality, device."""

    bundle_dir: Path
    source: str
    meta: dict[str, Any]
    algorithm: AlgorithmInfo
    modality: str | None
    device: torch.device

    @property
    def config_path(self) -> Path:
        return self.bundle_dir / "configs" / "inference.json"


def open_bundle(
    bundle_dir: str | Path,
    *,
    kind: str | None,
    device: str | torch.device | None,
    model_id: str | None,
    name: str | None,
    version: str | None,
    default_kind: str | None = "segmentation",
    need_config: bool = True,
) -> OpenedBundle:
    """Read ``configs/metadata.json`` of ``bundle_dir`` and check it is a bundle of ``kind`` (None: any).

    ``default_kind``: the kind of a bundle whose metadata names none (Model Zoo bundles:
    segmentation). ``need_config``: ``configs/inference.json`` must exist. Raises
    :class:`BundleError` naming the bundle.
    """
    folder = Path(bundle_dir)
    source = f"bundle {folder}"
    if need_config and not (folder / "configs" / "inference.json").is_file():
        raise BundleError(f"{source}: no configs/inference.json")
    meta = read_bundle_json(folder, "metadata.json")
    declared = (meta.get("dicom_node") or {}).get("kind", default_kind)
    if kind is not None and declared != kind:
        raise BundleError(f"{source}: dicom_node.kind is {declared!r}; this loader serves {kind} bundles")
    return OpenedBundle(bundle_dir=folder, source=source, meta=meta,
                        algorithm=algorithm_info(meta, folder, model_id, name, version),
                        modality=declared_modality(meta), device=resolve_device(device))


def bundle_parser(bundle: OpenedBundle, overrides: Mapping[str, Any] | None, required: Sequence[str],
                  config_globals: Mapping[str, Any] | None = None) -> Any:
    """MONAI's ``ConfigParser`` over the bundle's inference config, ready to build from.

    Sets ``bundle_root`` and ``device`` (the device chosen for this process), applies
    ``overrides`` (each must name an item of the config: a typo must not pass silently)
    and checks that the ``required`` items exist.
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser(globals=dict(config_globals)) if config_globals is not None else ConfigParser()
    parser.read_config(str(bundle.config_path))
    parser.read_meta(str(bundle.bundle_dir / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle.bundle_dir)
    parser["device"] = f"$torch.device({str(bundle.device)!r})"
    for key, value in (overrides or {}).items():
        if parser.get(key, MISSING) is MISSING:
            raise BundleError(f"{bundle.source}: override {key!r} names no item of configs/inference.json")
        parser[key] = value
    for key in required:
        if parser.get(key, MISSING) is MISSING:
            raise BundleError(f"{bundle.source}: configs/inference.json has no {key!r}")
    return parser


def bundle_network(parser: Any, bundle: OpenedBundle, *, random_weights: bool = False) -> torch.nn.Module:
    """The bundle's ``network_def`` with ``models/model.pt`` loaded, on the bundle's device, in eval mode.

    ``random_weights``: keep the network as built (only to prove that a bundle's configs
    run without their weights; logged as a warning).
    """
    network = parser.get_parsed_content("network_def")
    weights = bundle.bundle_dir / "models" / "model.pt"
    if random_weights:
        logger.warning("%s: serving the network as built, without weights (compatibility testing only)",
                       bundle.source)
    elif weights.is_file():
        load_weights(network, weights, bundle.source)
    else:
        raise BundleError(f"{bundle.source}: no models/model.pt")
    return network.to(bundle.device).eval()


class BundleModel(LabelledModel):
    """A model served from a bundle folder: what :func:`open_bundle` found, kept on the model.

    ``bundle_dir``, ``device`` and the algorithm's identity; ``_modality`` is the declared
    input modality, checked with :func:`check_modality` before each run.
    """

    bundle_dir: Path
    device: torch.device
    _modality: str | None = None

    def _keep(self, bundle: OpenedBundle) -> str:
        """Keep what every bundle model needs of ``bundle``; returns its ``source`` (for errors and logs)."""
        self.bundle_dir, self.device = bundle.bundle_dir, bundle.device
        self._algorithm = bundle.algorithm
        self._modality = bundle.modality
        return bundle.source
